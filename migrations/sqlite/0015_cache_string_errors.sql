-- Cache rows of a string error read as a vehicle become that VIN's
-- failure: see the Postgres migration 0018.
UPDATE vin_cache
SET error_code = 'API_ERROR',
    error_text = json_extract(raw, '$.error'),
    raw = json_object('VIN', json_extract(raw, '$.VIN'),
                      'error', json_object('code', 'API_ERROR', 'message', json_extract(raw, '$.error')))
WHERE error_code IS NULL
  AND json_type(raw, '$.error') = 'text'
  AND trim(json_extract(raw, '$.error')) <> ''
  AND NOT EXISTS (
      SELECT 1 FROM json_each(raw) f
      WHERE f.key IN ('Make', 'Model', 'ModelYear', 'BodyClass', 'DriveType', 'FuelTypePrimary', 'EngineConfiguration',
                    'EngineCylinders', 'DisplacementL', 'TransmissionStyle', 'PlantCity', 'PlantState',
                    'PlantCountry', 'Manufacturer', 'Series', 'Trim', 'Doors', 'VehicleType', 'GVWR',
                    'ErrorCode', 'ErrorText')
        AND trim(f.value) <> '');
