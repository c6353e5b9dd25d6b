// Decodes VINs (one per line on stdin) with Corgi JS, the peer decoder, and
// prints one JSON line per VIN: {vin, make, model, year}. Run from the
// directory Corgi JS is installed in (scripts/tools: tools_corgi_js).
import readline from 'node:readline';
import { createDecoder } from '@cardog/corgi';

const decoder = await createDecoder();
for await (const line of readline.createInterface({ input: process.stdin })) {
  const vin = line.trim();
  if (!vin) continue;
  const vehicle = (await decoder.decode(vin)).components.vehicle ?? {};
  console.log(JSON.stringify({ vin, make: vehicle.make ?? '', model: vehicle.model ?? '', year: vehicle.year ?? null }));
}
await decoder.close();
