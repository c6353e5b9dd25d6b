async function decodeVin(vin) {
  const response = await fetch('https://www.carvinapi.com/api/v1/decode', {
    method: 'POST',
    headers: {
      'Authorization': 'Bearer YOUR_API_KEY',
      'Content-Type': 'application/json',
    },
    body: JSON.stringify({ vin }),
  });

  if (!response.ok) {
    throw new Error(`API error: ${response.status}`);
  }

  return response.json();
}

// Usage
const vehicle = await decodeVin('1HGBH41JXMN109186');
console.log(vehicle.data.Make); // "HONDA"
console.log(vehicle.data.Model); // "Civic"
console.log(vehicle.data.Year); // "2021"
