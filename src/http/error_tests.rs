//! Unit tests of `error.rs`.

use super::*;

#[test]
fn error_types_serialise_as_their_wire_names() {
    let mut seen = std::collections::HashSet::new();
    for k in ErrorType::ALL {
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str(), "{k:?}");
        assert!(seen.insert(k.as_str()), "{} twice", k.as_str());
        let back: ErrorType = serde_json::from_value(k.as_str().into()).unwrap();
        assert_eq!(back, k);
    }
}

#[test]
fn retry_after_only_on_503() {
    assert_eq!(
        ApiError::Core(PredictError::Overloaded("m".into())).retry_after(),
        Some(1)
    );
    assert_eq!(
        ApiError::Core(PredictError::Timeout(1.0)).retry_after(),
        Some(1)
    );
    assert_eq!(ApiError::BadRequest("x".into()).retry_after(), None);
    let r = ApiError::Core(PredictError::Overloaded("m".into())).into_response();
    assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    assert_eq!(
        r.extensions().get::<Refusal>().unwrap().kind,
        ErrorType::Overloaded
    );
    let r = ApiError::BadRequest("x".into()).into_response();
    assert!(r.headers().get(header::RETRY_AFTER).is_none());
}

#[test]
fn transient_types_and_only_they_answer_503() {
    for k in ErrorType::ALL {
        assert_eq!(
            k.is_transient(),
            status(k) == StatusCode::SERVICE_UNAVAILABLE,
            "{k:?}"
        );
    }
}
