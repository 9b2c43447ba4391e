//! The OpenAPI 3.1 description served at `GET /openapi.json`.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn job_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The whole document.
pub fn document() -> Value {
    let unauthorized = error_response("Missing or wrong bearer token (when --api-key is set).");
    let not_found =
        error_response("Unknown job, or finished and expired (--result-ttl, --max-results).");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sd-worker",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Stable Diffusion image-generation worker: a bounded FIFO job queue run by one engine thread, with progress and previews over Server-Sent Events. Every route except /health and /ready needs `Authorization: Bearer <token>` when the worker was started with --api-key."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {
                            "type": {"type": "string", "enum": ["invalid_request", "malformed_json", "bad_request", "unauthorized", "not_found", "method_not_allowed", "conflict", "payload_too_large", "queue_full", "not_ready", "draining", "internal"]},
                            "message": {"type": "string", "description": "Names the field, the limit and the value for invalid_request."}
                        }
                    }}
                },
                "ImageGeneration": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["operation", "prompt"],
                    "properties": {
                        "operation": {"type": "string", "enum": ["image_generation"], "description": "See ImageTransform and ImageInpaint for the other operations."},
                        "prompt": {"type": "string", "minLength": 1, "maxLength": 20000},
                        "negative_prompt": {"type": ["string", "null"], "description": "Default: the empty prompt. Used when guidance_scale > 1."},
                        "width": {"type": ["integer", "null"], "description": "Multiple of the latent factor (GET /v1/info); default the model's size; width x height at most --max-pixels."},
                        "height": {"type": ["integer", "null"]},
                        "steps": {"type": ["integer", "null"], "minimum": 1, "default": 50, "description": "At most --max-steps and the scheduler's num_train_timesteps. Default 50; FLUX dev 28, FLUX schnell 4."},
                        "guidance_scale": {"type": ["number", "null"], "minimum": 0, "maximum": 100, "default": 7.5, "description": "Stable Diffusion: classifier-free guidance (default 7.5). FLUX dev: the embedded guidance (default 3.5); refused for FLUX schnell."},
                        "seed": {"type": ["integer", "null"], "minimum": -1, "description": "Seed of the torch-compatible CPU generator; omitted, null or -1: random (reported in the status and the complete event)."},
                        "scheduler": {"type": ["string", "null"], "enum": ["ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", null], "description": "Default: the model's own scheduler."},
                        "batch": {"type": ["integer", "null"], "minimum": 1, "default": 1, "description": "At most --max-batch."},
                        "preview_every": {"type": ["integer", "null"], "minimum": 0, "default": 5, "description": "A preview event every this many steps, none on the last step; 0: none."},
                        "preview": {"type": ["string", "null"], "enum": ["approx", "full", null], "default": "approx", "description": "approx: latent-to-RGB map at latent resolution; full: VAE decode."},
                        "hive_id": {"type": ["string", "null"], "maxLength": 256, "description": "Recorded on the job and shown in its status."},
                        "worker_id": {"type": ["string", "null"], "maxLength": 256, "description": "Recorded on the job and shown in its status."},
                        "loras": {"type": ["array", "null"], "maxItems": 8, "description": "LoRA adapters for this job only (needs --lora-dir). Kohya (lora_unet_/lora_te_, .alpha, LoCon), diffusers/PEFT (lora_A/lora_B, scale from lora_adapter_metadata) and, for FLUX, kohya and original-name layouts; UNet/transformer and CLIP text encoder. The base weights are never changed.", "items": {"type": "object", "additionalProperties": false, "required": ["path"], "properties": {
                            "path": {"type": "string", "maxLength": 1024, "description": "A .safetensors file inside --lora-dir (relative, no `..`; `.safetensors` may be left out). Symbolic links must stay inside the folder."},
                            "strength": {"type": "number", "minimum": -10, "maximum": 10, "default": 1.0, "description": "Multiplies the adapter (alpha / rank from the file)."},
                            "strict": {"type": "boolean", "default": true, "description": "true: keys that match no layer (or do not fit it) fail the job, listed in its error. false: the rest applies and the complete event lists them in `warnings`."}
                        }}},
                        "model": {"type": ["string", "null"], "description": "When given, must name the loaded model (folder name, path, or hub repo id of a Hugging Face cache snapshot)."},
                        "max_sequence_length": {"type": ["integer", "null"], "minimum": 2, "maximum": 512, "description": "FLUX models only: T5 prompt tokens (default 512 dev, 256 schnell); a 422 for Stable Diffusion models. FLUX models refuse negative_prompt and scheduler, and guidance_scale when they have no guidance embedding (schnell)."}
                    }
                },
                "ImageTransform": {
                    "description": "Image-to-image (diffusers' StableDiffusionImg2ImgPipeline, or FluxImg2ImgPipeline for FLUX models). Every field of ImageGeneration except `operation`, plus the ones below. Stable Diffusion: width/height default to the input's size rounded down to the latent factor; FLUX: to the model's size. The input is resized to width x height with Pillow's Lanczos.",
                    "type": "object",
                    "required": ["operation", "prompt", "input_image"],
                    "properties": {
                        "operation": {"type": "string", "enum": ["image_transform"]},
                        "input_image": {"type": "string", "description": "Base64 PNG, JPEG or WebP, or a data: URL. Grayscale is expanded to RGB, alpha dropped. At most --max-input-pixels (checked from the header)."},
                        "strength": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1, "default": 0.8, "description": "Share of the steps that run. Stable Diffusion: default 0.8, int(steps x strength) steps run and must be at least 1. FLUX: default 0.6, the run starts at int(steps - min(steps x strength, steps))."}
                    }
                },
                "ImageInpaint": {
                    "description": "Inpainting (diffusers' StableDiffusionInpaintPipeline): a 9-channel inpainting UNet, or a regular UNet blending the unmasked region back after each step (see /v1/info capabilities.inpaint_method). Every field of ImageGeneration except `operation`, plus the ones below. width/height default to the model's size, as in diffusers; image and mask are resized to it.",
                    "type": "object",
                    "required": ["operation", "prompt", "init_image", "mask_image"],
                    "properties": {
                        "operation": {"type": "string", "enum": ["image_inpaint"]},
                        "init_image": {"type": "string", "description": "Base64 PNG, JPEG or WebP, or a data: URL."},
                        "mask_image": {"type": "string", "description": "Base64 image of any size (resized to the output size: Lanczos, nearest for palette and 1-bit PNGs); converted to luma after resizing; luma >= 128 (white) is repainted. Alpha is dropped."},
                        "strength": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1, "default": 1.0}
                    }
                },
                "Submitted": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "status_url": {"type": "string"},
                        "events_url": {"type": "string"},
                        "sse_url": {"type": "string"}
                    }
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "operation": {"type": "string"},
                        "state": {"type": "string", "enum": ["queued", "running", "completed", "failed", "cancelled"]},
                        "position": {"type": ["integer", "null"], "description": "1 = next to run; null when not queued."},
                        "step": {"type": "integer"},
                        "total": {"type": "integer"},
                        "percent": {"type": "number"},
                        "created_at": {"type": "number", "description": "Unix seconds."},
                        "timings": {"$ref": "#/components/schemas/Timings"},
                        "seed": {"type": "integer"},
                        "error": {"type": ["object", "null"], "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
                        "cancel_reason": {"type": ["string", "null"], "enum": ["client", "timeout", "shutdown", null]},
                        "cancel_requested": {"type": "boolean"},
                        "hive_id": {"type": ["string", "null"]},
                        "worker_id": {"type": ["string", "null"]},
                        "images": {"type": "array", "items": {"type": "string"}, "description": "URLs of the result images."},
                        "status_url": {"type": "string"},
                        "events_url": {"type": "string"},
                        "request": {"type": "object", "description": "The request with every default applied."},
                        "warnings": {"type": "array", "items": {"type": "string"}, "description": "A completed job's warnings (LoRA keys not applied with strict false)."}
                    }
                },
                "Timings": {
                    "type": "object",
                    "description": "Seconds: queue (waiting), generation (engine, previews included), preview (making and encoding previews), encode (result PNG + base64), total (submission to final state).",
                    "properties": {
                        "queue": {"type": ["number", "null"]},
                        "generation": {"type": ["number", "null"]},
                        "preview": {"type": "number"},
                        "encode": {"type": ["number", "null"]},
                        "total": {"type": ["number", "null"]}
                    }
                }
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Queue a job",
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/ImageGeneration"},
                        {"$ref": "#/components/schemas/ImageTransform"},
                        {"$ref": "#/components/schemas/ImageInpaint"}
                    ], "discriminator": {"propertyName": "operation"}}}}},
                    "responses": {
                        "202": {"description": "Queued.", "headers": {"Location": {"schema": {"type": "string"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submitted"}}}},
                        "400": error_response("The body is not JSON."),
                        "401": unauthorized,
                        "413": error_response("The body is over --max-body-bytes."),
                        "422": error_response("A field is invalid, unknown or missing; the message names it."),
                        "429": {"description": "The queue is full (--max-queue).", "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                        "503": error_response("The model is loading, or the worker is draining.")
                    }
                },
                "get": {
                    "summary": "Queued jobs (in order), running, then finished jobs (newest first)",
                    "responses": {"200": {"description": "Jobs.", "content": {"application/json": {"schema": {"type": "object", "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}}}}}}, "401": unauthorized}
                }
            },
            "/v1/jobs/{id}": {
                "parameters": [job_id_param()],
                "get": {
                    "summary": "A job's state, position, progress, timings, seed, error and result URLs",
                    "responses": {"200": {"description": "The job.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}, "401": unauthorized, "404": not_found}
                },
                "delete": {
                    "summary": "Cancel a job",
                    "responses": {
                        "200": {"description": "The job was queued and is now cancelled.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                        "202": {"description": "The job is running and stops after its current step (state becomes cancelled).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                        "401": unauthorized,
                        "404": not_found,
                        "409": error_response("The job already finished, or its last step is done (only decoding and encoding remain).")
                    }
                }
            },
            "/v1/jobs/{id}/events": {
                "parameters": [job_id_param()],
                "get": {
                    "summary": "Server-Sent Events of a job",
                    "description": "Events (the SSE event name equals the `type` field of the JSON data): queued {position}; started; progress {step, total, percent}; preview {step, total, width, height, image (base64), format}; complete {operation, inpaint_method (inpainting jobs, else null), images (base64), image (the first), format, seed, timings}; error {message, error {type, message}}; cancelled {reason}. A subscriber first receives the job's current state (or its final event), the stream ends after the final event, and comment lines keep the connection alive.",
                    "responses": {"200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}, "401": unauthorized, "404": not_found}
                }
            },
            "/v1/jobs/{id}/stream": {
                "parameters": [job_id_param()],
                "get": {"summary": "The same as /v1/jobs/{id}/events", "responses": {"200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}, "401": unauthorized, "404": not_found}}
            },
            "/v1/jobs/{id}/images/{n}": {
                "parameters": [job_id_param(), {"name": "n", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0}}],
                "get": {
                    "summary": "Result image n (0-based) as PNG, with the A1111 `parameters` text chunk",
                    "responses": {"200": {"description": "The image.", "content": {"image/png": {}}}, "401": unauthorized, "404": not_found, "409": error_response("The job has not completed.")}
                }
            },
            "/v1/info": {
                "get": {"summary": "Model family and variant, device, dtype, defaults, limits, schedulers, capabilities, version", "responses": {"200": {"description": "Worker information.", "content": {"application/json": {}}}, "401": unauthorized, "503": error_response("The model is loading.")}}
            },
            "/metrics": {
                "get": {"summary": "Prometheus metrics: queue depth, jobs by outcome, step and job seconds", "responses": {"200": {"description": "Text exposition format 0.0.4.", "content": {"text/plain": {}}}, "401": unauthorized}}
            },
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}, "401": unauthorized}}
            },
            "/health": {
                "get": {"summary": "200 while the process lives (no auth)", "security": [], "responses": {"200": {"description": "Alive.", "content": {"application/json": {}}}}}
            },
            "/ready": {
                "get": {"summary": "200 once the model is loaded; 503 {ready: false, reason: loading | draining | failed} otherwise (no auth)", "security": [], "responses": {"200": {"description": "Ready."}, "503": {"description": "Not ready."}}}
            }
        }
    })
}
