async function batchDecode(vins) {
  const response = await fetch('https://www.carvinapi.com/api/v1/batch-decode', {
    method: 'POST',
    headers: {
      'Authorization': 'Bearer YOUR_API_KEY',
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({ vins }),
  });

  if (!response.ok) {
    throw new Error(`API error: ${response.status}`);
  }

  return response.json();
}

// Process an inventory CSV
const inventoryVins = [
  '1HGBH41JXMN109186',
  '5YJSA1DG9DFP14705',
  'WBAPH5C55BA218692',
];

const results = await batchDecode(inventoryVins);
results.data.forEach(vehicle => {
  console.log(`${vehicle.Make} ${vehicle.Model} (${vehicle.ModelYear})`);
});

// Chunking helper for large datasets
function chunkArray(array, size) {
  const chunks = [];
  for (let i = 0; i < array.length; i += size) {
    chunks.push(array.slice(i, i + size));
  }
  return chunks;
}

async function decodeAll(vins) {
  const chunks = chunkArray(vins, 20);
  const results = [];

  for (const chunk of chunks) {
    const response = await batchDecode(chunk);
    results.push(...response.data);

    // Respect rate limits
    await new Promise(resolve => setTimeout(resolve, 200));
  }

  return results;
}
// --- test harness ---
const all = await decodeAll(Array.from({ length: 45 }, (_, i) => inventoryVins[i % 3]));
console.log(`decodeAll: ${all.length}`);
