//! Named secrets at the control plane's edge (issue 19 §4, decision 8): the
//! names are checked here and by policy, stored with the job and audited;
//! values never reach this process (the data plane resolves them).

use std::collections::BTreeMap;

use shared::{CodedError, ErrorCode};

/// Checks a request's secret names: at most `shared::secrets::MAX_SECRETS`,
/// each `^[A-Z][A-Z0-9_]{0,63}$`, none twice and none also in `env`.
/// 400 `invalid_argument` naming the bad one, before policy is asked.
pub fn validate(
    names: Option<&[String]>,
    env: Option<&BTreeMap<String, String>>,
) -> Result<(), CodedError> {
    let Some(names) = names else { return Ok(()) };
    shared::secrets::check_names(names)
        .and_then(|()| shared::secrets::check_no_env_clash(names, env))
        .map_err(|m| CodedError::new(ErrorCode::InvalidArgument, format!("secrets: {m}")))
}
