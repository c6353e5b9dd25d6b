curl -X POST https://www.carvinapi.com/api/v1/recalls \
-H "Authorization: Bearer YOUR_API_KEY" \
-H "Content-Type: application/json" \
-d '{
"make": "Honda",
"model": "Civic",
"year": "2020"
}'
