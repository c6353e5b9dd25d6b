curl -X POST https://www.carvinapi.com/api/v1/batch-decode \
-H "Authorization: Bearer YOUR_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"vins": [
"1HGBH41JXMN109186",
"5YJSA1DG9DFP14705",
"WBAPH5C55BA218692"
]
}'
