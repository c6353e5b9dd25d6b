-- A batch entry such as {"VIN": …, "error": "Invalid VIN"}, with no field
-- decoded beside VIN, was stored by earlier versions as a decoded vehicle
-- with empty fields, and served from the cache as one until its TTL. Such
-- rows become what vinetl now stores for that entry: the VIN's failure,
-- code API_ERROR, with the text (src/api.rs, BatchEntry). No call is made
-- again for them; they are failures cached for the spec's ttl_hours, as
-- any per-VIN failure. The field names are vinetl's named vehicle fields.
UPDATE vin_cache
SET error_code = 'API_ERROR',
    error_text = raw ->> 'error',
    raw = jsonb_build_object('VIN', raw -> 'VIN',
                             'error', jsonb_build_object('code', 'API_ERROR', 'message', raw -> 'error'))
WHERE error_code IS NULL
  AND jsonb_typeof(raw -> 'error') = 'string'
  AND btrim(raw ->> 'error') <> ''
  AND NOT EXISTS (
      SELECT 1 FROM jsonb_each_text(raw) f
      WHERE f.key IN ('Make', 'Model', 'ModelYear', 'BodyClass', 'DriveType', 'FuelTypePrimary', 'EngineConfiguration',
                    'EngineCylinders', 'DisplacementL', 'TransmissionStyle', 'PlantCity', 'PlantState',
                    'PlantCountry', 'Manufacturer', 'Series', 'Trim', 'Doors', 'VehicleType', 'GVWR',
                    'ErrorCode', 'ErrorText')
        AND btrim(f.value) <> '');
