async function fetchWithRetry(url, options, maxRetries = 3) {
  for (let attempt = 0; attempt < maxRetries; attempt++) {
    try {
      const response = await fetch(url, options);

      if (response.status === 429) {
        // Rate limited — wait with exponential backoff
        const delay = Math.pow(2, attempt) * 1000;
        console.log(`Rate limited. Retrying in ${delay}ms...`);
        await new Promise(resolve => setTimeout(resolve, delay));
        continue;
      }

      return response;
    } catch (error) {
      if (attempt === maxRetries - 1) throw error;

      const delay = Math.pow(2, attempt) * 1000;
      await new Promise(resolve => setTimeout(resolve, delay));
    }
  }
}

function isValidVinFormat(vin) {
  // VINs are exactly 17 characters, alphanumeric, excluding I, O, Q
  const vinRegex = /^[A-HJ-NPR-Z0-9]{17}$/i;
  return vinRegex.test(vin);
}
// --- test harness ---
console.log(`valid: ${isValidVinFormat('1HGBH41JXMN109186')} ${isValidVinFormat('1HGBH41JXMN10918I')}`);
const response = await fetchWithRetry('https://www.carvinapi.com/api/v1/decode', {
  method: 'POST',
  headers: { 'Authorization': 'Bearer YOUR_API_KEY', 'Content-Type': 'application/json' },
  body: JSON.stringify({ vin: '1HGBH41JXMN109186' }),
});
console.log(`final: ${response === undefined ? 'gave up' : response.status}`);
