//! The web UI: the bundle built from `ui/app` into `ui/dist` (committed, so building the binary needs no
//! Node; `.ci/run` checks it is current), embedded in the binary and served at `/`. The UI routes with
//! the URL's fragment, so every page is `/`; what is not a file of the bundle falls through to the API's
//! JSON 404.

use axum::http::{header, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "ui/dist"]
struct Bundle;

/// The page's own policy: scripts, styles and API calls from this origin only (nothing from a CDN); images
/// also from `data:`/`blob:` (previews, results fetched with the token) and from any host (presigned
/// object-store URLs).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob: http: https:; connect-src 'self'; font-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The bundle's file at `uri`, for GET and HEAD; `None` when the bundle has none.
pub(super) fn serve(method: &Method, uri: &Uri) -> Option<Response> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let path = match uri.path().trim_start_matches('/') {
        "" => "index.html",
        p => p,
    };
    let file = Bundle::get(path)?;
    let mime = file.metadata.mimetype();
    // Vite names assets by their content's hash: they never change; the page itself always revalidates.
    let cache = if path.starts_with("assets/") { "public, max-age=31536000, immutable" } else { "no-cache" };
    let mut response = (
        [
            (header::CONTENT_TYPE, HeaderValue::from_str(mime).unwrap_or(HeaderValue::from_static("text/plain"))),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        file.data.into_owned(),
    )
        .into_response();
    if mime.starts_with("text/html") {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_served_and_nothing_else() {
        let get = |path: &str| serve(&Method::GET, &path.parse().unwrap());
        let page = get("/").expect("index.html is embedded");
        assert!(page.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
        assert!(page.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
        assert_eq!(page.headers()[header::CACHE_CONTROL], "no-cache");
        let asset = Bundle::iter().find(|p| p.starts_with("assets/") && p.ends_with(".js")).expect("a script");
        let script = get(&format!("/{asset}")).unwrap();
        assert!(script.headers()[header::CONTENT_TYPE].to_str().unwrap().contains("javascript"));
        assert!(script.headers()[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
        assert!(get("/v1/jobs").is_none() && get("/nothing.html").is_none());
        assert!(serve(&Method::POST, &"/".parse().unwrap()).is_none());
    }
}
