-- The output columns of each cached decode, apart from the full API JSON:
-- writing outputs reads this small document instead of parsing the whole
-- answer for every row (BENCHMARKS.md, "Outputs").
ALTER TABLE vin_cache ADD COLUMN fields JSONB;
UPDATE vin_cache SET fields = (SELECT coalesce(jsonb_object_agg(k, raw -> k), '{}') FROM unnest(ARRAY['Make', 'Model', 'ModelYear', 'Manufacturer', 'Series', 'Trim', 'VehicleType', 'BodyClass', 'Doors', 'DriveType', 'FuelTypePrimary', 'EngineConfiguration', 'EngineCylinders', 'DisplacementL', 'TransmissionStyle', 'GVWR', 'PlantCity', 'PlantState', 'PlantCountry', 'ErrorCode']) AS k
                               WHERE raw ? k);
