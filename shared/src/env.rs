//! The deployment environment (`ENV`) and the guard for development-only flags.

/// True when `ENV` names production (`production` or `prod`, any case).
pub fn is_production(env: &str) -> bool {
    matches!(
        env.trim().to_ascii_lowercase().as_str(),
        "production" | "prod"
    )
}

/// Refuses a development-only flag in production, naming the variable.
pub fn refuse_in_production(env: &str, flag: &str, enabled: bool) -> Result<(), String> {
    if enabled && is_production(env) {
        return Err(format!(
            "{flag} must not be enabled when ENV={env}: refusing to start"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_names() {
        assert!(is_production("production"));
        assert!(is_production("PROD"));
        assert!(!is_production("dev"));
        assert!(refuse_in_production("production", "AUTHZ_BYPASS", true).is_err());
        assert!(refuse_in_production("production", "AUTHZ_BYPASS", false).is_ok());
        assert!(refuse_in_production("dev", "AUTHZ_BYPASS", true).is_ok());
    }
}
