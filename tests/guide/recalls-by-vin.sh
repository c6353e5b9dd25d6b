curl -X POST https://www.carvinapi.com/api/v1/recalls \
-H "Authorization: Bearer YOUR_API_KEY" \
-H "Content-Type: application/json" \
-d '{"vin": "1HGBH41JXMN109186"}'
