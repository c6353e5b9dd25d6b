import requests

def decode_vin(vin: str, api_key: str) -> dict:
    response = requests.post(
        'https://www.carvinapi.com/api/v1/decode',
        headers={
            'Authorization': f'Bearer {api_key}',
            'Content-Type': 'application/json',
        },
        json={'vin': vin}
    )
    response.raise_for_status()
    return response.json()

# Usage
vehicle = decode_vin('1HGBH41JXMN109186', 'YOUR_API_KEY')
print(vehicle['data']['Make']) # "HONDA"
print(vehicle['data']['Model']) # "Civic"
