//! The HTTP side of API keys ([`crate::access`]): the middleware that guards a
//! group of routes with a scope.

use axum::extract::Request;
use axum::extract::State;
use axum::middleware::Next;
use axum::response::Response;

pub use crate::access::ApiKeys;
pub use crate::access::AuthError;
pub use crate::access::Caller;
pub use crate::access::KeysError;
pub use crate::access::Scope;
pub use crate::access::new_key;
pub use crate::access::new_key_text;
pub use crate::access::presented_key;
pub use crate::access::to_hex;
use crate::http::ApiError;
use crate::http::AppState;

/// Middleware guarding a group of routes with `scope`: lets the request in with its
/// [`Caller`] as an extension, or answers 401/403. Without a keys file every request
/// is the anonymous caller.
pub async fn require(
    State((state, scope)): State<(AppState, Scope)>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = match state.api_keys() {
        // Changing the models is for a caller with a key of the `admin` scope, never
        // for anyone who can reach the port.
        None if scope == Scope::Admin => {
            let e = crate::access::AuthError::Forbidden {
                caller: Caller::anonymous().0,
                scope,
            };
            note_refusal(&state, &req, scope, &e);
            return Err(ApiError::Auth(e));
        }
        None => Caller::anonymous(),
        Some(keys) => match keys.authorize(presented_key(req.headers()), scope) {
            Ok(c) => c,
            Err(e) => {
                let reason = e.reason();
                state
                    .metrics()
                    .auth_refused
                    .with_label_values(&[reason])
                    .inc();
                note_refusal(&state, &req, scope, &e);
                return Err(ApiError::Auth(e));
            }
        },
    };
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The audit trail's record of a refused caller (rate-limited there): who, on which
/// route (its template: a raw path may carry an identifier), for which scope.
fn note_refusal(state: &AppState, req: &Request, scope: Scope, e: &AuthError) {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    let request_id = req
        .extensions()
        .get::<crate::predict::Asker>()
        .map(|a| a.request_id.clone())
        .unwrap_or_default();
    state
        .core()
        .audit()
        .note_refusal(crate::audit::AuditEvent::auth_refused(
            "http",
            format!("{} {route}", req.method()),
            request_id,
            scope,
            e,
        ));
}
