//! The one place where a storage failure becomes a coded error. Storage
//! (`crate::storage`) knows nothing of codes or HTTP; the domain modules
//! turn its [`StorageError`] into a [`CodedError`] with `?` through this
//! conversion: a database that cannot be reached -> `storage_unavailable`
//! (503, worth retrying), anything else -> `internal` (500: a bug, or data
//! altered at rest), logged here with its detail and answered without it.

use shared::CodedError;
use shared::ErrorCode;

use crate::storage::StorageError;

impl From<StorageError> for CodedError {
    fn from(e: StorageError) -> CodedError {
        match e {
            StorageError::Unavailable(_) => {
                CodedError::new(ErrorCode::StorageUnavailable, e.to_string())
            }
            StorageError::Corrupt { ref what, .. } => {
                tracing::error!(error = %e, "a stored row does not parse");
                CodedError::new(ErrorCode::Internal, format!("stored {what} is corrupt"))
            }
            StorageError::Query(_)
            | StorageError::Encode { .. }
            | StorageError::Config(_)
            | StorageError::Migrate(_) => {
                tracing::error!(error = %e, "database error");
                CodedError::new(ErrorCode::Internal, "database error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::DatabaseDriver;
    use crate::storage::testing::TestDb;

    #[tokio::test]
    async fn unreachable_is_503_and_the_rest_hides_its_detail() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        t.db.close().await;
        let down = CodedError::from(t.db.ping().await.unwrap_err());
        assert_eq!(down.code, ErrorCode::StorageUnavailable, "{down:?}");
        let bug = CodedError::from(StorageError::Config("secret detail".into()));
        assert_eq!(
            (bug.code, bug.message.as_str()),
            (ErrorCode::Internal, "database error")
        );
        let corrupt = CodedError::from(StorageError::corrupt("job spec", "expected value"));
        assert_eq!(corrupt.code, ErrorCode::Internal);
        assert_eq!(corrupt.message, "stored job spec is corrupt");
    }
}
