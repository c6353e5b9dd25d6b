//! The OpenAPI 3.0 description of `vinetl serve`, served at
//! `/api/v1/openapi.json`. The contract tests run schemathesis against it, so
//! it must say exactly what the server does.

use serde_json::{Value, json};

use crate::api::{MAX_BATCH, VEHICLE_FIELDS};

/// What `Vin::parse_exact` accepts.
const VIN_PATTERN: &str = "^[A-HJ-NPR-Za-hj-npr-z0-9]{17}$";

pub fn document() -> Value {
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let quota_headers = json!({
        "X-RateLimit-Limit": {"description": "Requests allowed in the current window", "schema": {"type": "integer"}},
        "X-RateLimit-Remaining": {"description": "Requests left in the current window", "schema": {"type": "integer"}},
        "X-RateLimit-Reset": {"description": "Unix time (seconds) when the window resets", "schema": {"type": "integer"}}
    });
    let mut limited_headers = quota_headers.clone();
    limited_headers["Retry-After"] =
        json!({"description": "Seconds to wait before retrying", "schema": {"type": "integer"}});
    let too_many = json!({
        "description": "Rate limit or daily quota exceeded",
        "headers": limited_headers,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let common = |ok: Value| {
        json!({
            "200": ok,
            "400": error("Invalid request: bad JSON, wrong fields or a malformed VIN"),
            "401": error("Missing or invalid API key where one is needed"),
            "413": error("Request body too large"),
            "429": too_many.clone(),
            "500": error("Server error")
        })
    };
    let ok = |schema: &str| {
        json!({
            "description": "Success",
            "headers": quota_headers.clone(),
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
        })
    };
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let string = json!({"type": "string"});
    let vehicle_fields: Vec<&str> = std::iter::once("VIN")
        .chain(VEHICLE_FIELDS.iter().copied())
        .chain(["ErrorCode", "ErrorText", "Year"])
        .collect();
    let vehicle_props: serde_json::Map<String, Value> =
        vehicle_fields.iter().map(|f| (f.to_string(), string.clone())).collect();
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Car Vin API (vinetl serve)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "VIN decoding, batch decoding and recall lookups on embedded NHTSA vPIC data, compatible with the Car Vin API integration guide. A batch of up to 20 VINs counts as one request. Quotas reset at midnight UTC."
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Vin": {
                    "type": "string", "pattern": VIN_PATTERN,
                    "description": "17 characters, letters (either case) and digits, never I, O or Q; nothing around them"
                },
                "DecodeRequest": {
                    "type": "object", "required": ["vin"], "additionalProperties": false,
                    "properties": {"vin": {"$ref": "#/components/schemas/Vin"}}
                },
                "BatchDecodeRequest": {
                    "type": "object", "required": ["vins"], "additionalProperties": false,
                    "properties": {"vins": {
                        "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                        "description": "VINs as strings. Each entry is validated on its own: an invalid VIN, or an entry that is not a string, gets an error entry and the rest decode",
                        "items": {}
                    }}
                },
                "RecallsRequest": {
                    "description": "Either a VIN, or make, model and year (make and model match case-insensitively)",
                    "oneOf": [
                        {
                            "type": "object", "required": ["vin"], "additionalProperties": false,
                            "properties": {"vin": {"$ref": "#/components/schemas/Vin"}}
                        },
                        {
                            "type": "object", "required": ["make", "model", "year"], "additionalProperties": false,
                            "properties": {
                                "make": {"type": "string"},
                                "model": {"type": "string"},
                                "year": {"oneOf": [
                                    {"type": "string", "pattern": "^[1-9][0-9]{3}$"},
                                    {"type": "integer", "minimum": 1000, "maximum": 9999}
                                ]}
                            }
                        }
                    ]
                },
                "Vehicle": {
                    "type": "object", "required": vehicle_fields,
                    "properties": vehicle_props,
                    "additionalProperties": {"type": "string"},
                    "description": "vPIC variables as strings; empty when unknown. Year is ModelYear again, under the name the integration guide's example reads. ErrorCode is vPIC's (0 = clean, 1 = check digit, 7 = maker not registered, 8 = no detailed data, 11 = model year)."
                },
                "BatchEntry": {
                    "oneOf": [
                        {"$ref": "#/components/schemas/Vehicle"},
                        {
                            "type": "object", "required": ["VIN", "error"], "additionalProperties": false,
                            "properties": {"VIN": {"description": "the entry as sent: a string, or the JSON value that was not one"}, "error": {"$ref": "#/components/schemas/ErrorDetail"}}
                        }
                    ]
                },
                "DecodeResponse": {
                    "type": "object", "required": ["success", "data"],
                    "properties": {"success": {"type": "boolean", "enum": [true]}, "data": {"$ref": "#/components/schemas/Vehicle"}}
                },
                "BatchDecodeResponse": {
                    "type": "object", "required": ["success", "data"],
                    "properties": {
                        "success": {"type": "boolean", "enum": [true]},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/BatchEntry"}}
                    }
                },
                "Recall": {
                    "type": "object",
                    "required": ["NHTSACampaignNumber", "Manufacturer", "Component", "Summary", "Consequence", "Remedy", "ReportReceivedDate", "ModelYear", "Make", "Model", "parkIt", "parkOutSide"],
                    "properties": {
                        "NHTSACampaignNumber": string, "Manufacturer": string, "Component": string, "Summary": string,
                        "Consequence": string, "Remedy": string,
                        "ReportReceivedDate": {"type": "string", "description": "DD/MM/YYYY"},
                        "Notes": {"type": "string", "nullable": true},
                        "ModelYear": string, "Make": string, "Model": string,
                        "parkIt": {"type": "boolean"}, "parkOutSide": {"type": "boolean"},
                        "overTheAirUpdate": {"type": "boolean"}, "NHTSAActionNumber": string
                    }
                },
                "RecallsResponse": {
                    "type": "object", "required": ["success", "recalls"],
                    "properties": {
                        "success": {"type": "boolean", "enum": [true]},
                        "recalls": {"type": "array", "items": {"$ref": "#/components/schemas/Recall"}}
                    }
                },
                "ErrorDetail": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": string, "message": string}
                },
                "Error": {
                    "type": "object", "required": ["success", "error"],
                    "properties": {"success": {"type": "boolean", "enum": [false]}, "error": {"$ref": "#/components/schemas/ErrorDetail"}}
                }
            }
        },
        "paths": {
            "/api/v1/decode": {"post": {
                "operationId": "decode",
                "summary": "Decode one VIN (anonymous callers allowed: 10 requests a day)",
                "security": [{}, {"bearerAuth": []}],
                "requestBody": body("DecodeRequest"),
                "responses": common(ok("DecodeResponse"))
            }},
            "/api/v1/batch-decode": {"post": {
                "operationId": "batchDecode",
                "summary": "Decode 1 to 20 VINs in one request (API key required); invalid VINs get per-entry errors",
                "security": [{"bearerAuth": []}],
                "requestBody": body("BatchDecodeRequest"),
                "responses": common(ok("BatchDecodeResponse"))
            }},
            "/api/v1/recalls": {"post": {
                "operationId": "recalls",
                "summary": "Safety recalls for a VIN, or for a make, model and year (API key required)",
                "security": [{"bearerAuth": []}],
                "requestBody": body("RecallsRequest"),
                "responses": common(ok("RecallsResponse"))
            }}
        }
    })
}
