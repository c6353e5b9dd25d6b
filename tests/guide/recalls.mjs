async function checkRecalls(vin) {
  const response = await fetch('https://www.carvinapi.com/api/v1/recalls', {
    method: 'POST',
    headers: {
      'Authorization': 'Bearer YOUR_API_KEY',
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({ vin }),
  });

  const data = await response.json();

  if (data.recalls && data.recalls.length > 0) {
    console.log(`⚠️ ${data.recalls.length} active recall(s) found:`);
    data.recalls.forEach(recall => {
      console.log(` - ${recall.Component}: ${recall.Summary}`);
    });
  } else {
    console.log('✅ No active recalls found');
  }

  return data;
}
// --- test harness ---
await checkRecalls('5YJSA1DG9DFP14705');
await checkRecalls('1HGBH41JXMN109186');
