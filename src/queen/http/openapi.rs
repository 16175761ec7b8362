//! The OpenAPI document of the API (`GET /openapi.json`), generated from the handlers' and the contract's
//! definitions.

use axum::Json;

use super::{a1111, auth, events, fleet, jobs, metrics, openai};
use crate::api::{
    ApiErrorBody, ApiErrorCode, ApiErrorDetail, ApiEvent, CancelResponse, CancelState, ImageInput, JobList,
    JobSubmission, LimitsView, ModelInfo, RequestSummary, StatusView, SubmitResponse, TokenInfo, UploadResponse,
    WorkerInfo,
};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "sd-rbee queen", description = "Stable Diffusion jobs on a worker fleet"),
    paths(jobs::submit, jobs::upload, jobs::status, jobs::list, jobs::cancel, jobs::image, events::events,
        fleet::models, fleet::workers, fleet::limits, auth::me, fleet::health, fleet::ready, metrics::metrics,
        openai::generations, openai::edits, a1111::txt2img, a1111::img2img, a1111::models, a1111::samplers,
        a1111::progress),
    components(schemas(ApiErrorBody, ApiErrorDetail, ApiErrorCode, ApiEvent, JobSubmission, ImageInput,
        SubmitResponse, StatusView, JobList, CancelResponse, CancelState, UploadResponse, ModelInfo, WorkerInfo, LimitsView, TokenInfo,
        RequestSummary, crate::api::openai::OpenAiImageRequest, crate::api::openai::OpenAiImagesResponse,
        crate::api::openai::OpenAiImage, crate::api::a1111::A1111Request, crate::api::a1111::A1111Response,
        crate::api::a1111::A1111Model, crate::api::a1111::A1111Sampler, crate::api::a1111::A1111Progress,
        crate::api::a1111::A1111ProgressState, crate::api::WebhookBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every route behind a token may answer 401: said once here rather than on each handler.
        let unauthorized = ResponseBuilder::new()
            .description("no token, or not one of the queen's")
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ApiErrorBody"))).build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    operation.responses.responses.entry("401".into()).or_insert_with(|| unauthorized.clone().into());
                }
            }
        }
    }
}

pub(super) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_the_endpoints_and_types() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/v1/jobs/{id}/images/{n}",
            "/v1/uploads",
            "/v1/models",
            "/v1/workers",
            "/v1/limits",
            "/health",
            "/ready",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["paths"]["/v1/jobs"]["post"]["requestBody"].is_object());
        let schemas = &doc["components"]["schemas"];
        let submission = &schemas["JobSubmission"]["properties"];
        for field in ["model", "prompt", "width", "height", "steps", "init_image", "mask", "strength", "timeout_s"] {
            assert!(submission[field].is_object(), "JobSubmission.{field}");
        }
        let required: Vec<&str> =
            schemas["JobSubmission"]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(required.contains(&"model") && required.contains(&"prompt"));
        assert!(
            schemas["JobState"].is_object() && schemas["ErrorCode"].is_object() && schemas["StatusView"].is_object()
        );
        let codes = serde_json::to_string(&schemas["ApiErrorCode"]).unwrap();
        assert!(codes.contains("MALFORMED_REQUEST") && codes.contains("UNAVAILABLE"), "{codes}");
        assert!(schemas["ApiEvent"].is_object());
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let secured = operation["security"].as_array().is_some_and(|s| !s.is_empty());
                assert_eq!(operation["responses"]["401"].is_object(), secured, "{method} {path}: 401 when secured");
            }
        }
    }

    #[test]
    fn the_sdk_is_generated_from_this_document() {
        use utoipa::OpenApi;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ui/packages/sdk/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap();
        let current = ApiDoc::openapi().to_pretty_json().unwrap();
        assert!(
            committed.trim_end() == current.trim_end(),
            "{path} is not the queen's OpenAPI document: run `sd-rbee openapi > ui/packages/sdk/openapi.json` and \
             `npm run gen` in ui/"
        );
    }
}
