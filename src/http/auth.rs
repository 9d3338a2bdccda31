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
            return Err(ApiError::Auth(crate::access::AuthError::Forbidden {
                caller: Caller::anonymous().0,
                scope,
            }));
        }
        None => Caller::anonymous(),
        Some(keys) => match keys.authorize(presented_key(req.headers()), scope) {
            Ok(c) => c,
            Err(e) => {
                let reason = match &e {
                    AuthError::Missing => "missing",
                    AuthError::Invalid => "invalid",
                    AuthError::Forbidden { .. } => "forbidden",
                };
                state
                    .metrics()
                    .auth_refused
                    .with_label_values(&[reason])
                    .inc();
                return Err(ApiError::Auth(e));
            }
        },
    };
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}
