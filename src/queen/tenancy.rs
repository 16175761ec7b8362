//! Tenants: a `--token-file` line's `tenant=NAME` makes its token one tenant's. A tenant's token sees and
//! acts on that tenant's jobs alone (another's answer `404`, as if there were none), stores its uploads
//! under `uploads/<tenant>/` and names no other object as an input image, and its results are cached apart
//! from other tenants'. A token without a tenant is an operator's: it sees every job. The tenant is set from
//! the token on submission, carried by the job message and kept in its status record and index entry.

use crate::api::JobStatus;
use crate::protocol::{self, ImageSource, JobRequest};

/// What a tenant may not do (`403 FORBIDDEN`), naming the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Forbidden {
    pub field: Option<String>,
    pub message: String,
}

/// Whose jobs a request may see and act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every job: an operator's token, or a queen without authentication.
    #[default]
    All,
    /// One tenant's jobs.
    Tenant(String),
}

impl Scope {
    /// The tenant, for a tenant's scope.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Tenant(t) => Some(t),
        }
    }

    /// Whether the job of `status` is within the scope.
    pub fn sees(&self, status: &JobStatus) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => status.tenant.as_deref() == Some(t),
        }
    }

    /// Marks `job` as submitted within the scope, after checking that its input images are the scope's own:
    /// a tenant's job names only its own uploads by key (any other object, another tenant's upload or
    /// results, would come back to it through img2img).
    pub fn claim(&self, job: &mut JobRequest) -> Result<(), Forbidden> {
        job.tenant = self.tenant().map(str::to_string);
        let Scope::Tenant(tenant) = self else { return Ok(()) };
        let own = protocol::uploads_prefix(Some(tenant));
        for (field, source) in [("init_image", &job.init_image), ("mask", &job.mask)] {
            if let Some(ImageSource::ObjectKey(key)) = source {
                if !key.starts_with(&own) {
                    return Err(Forbidden {
                        field: Some(field.into()),
                        message: format!(
                            "names the object {}, not one of this token's uploads (keys under {own}); upload the \
                             image with POST /v1/uploads and send the key it answers",
                            protocol::quoted(key)
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::JobKind;

    #[test]
    fn a_tenant_sees_its_own_jobs_and_names_only_its_own_uploads() {
        let acme = Scope::Tenant("acme".into());
        let mut job = JobRequest::new(JobKind::Img2Img, "tiny", "a kite");
        job.init_image = Some(ImageSource::ObjectKey("uploads/acme/1.png".into()));
        acme.claim(&mut job).unwrap();
        assert_eq!(job.tenant.as_deref(), Some("acme"));
        let status = JobStatus::queued(&job, None);
        assert!(acme.sees(&status) && Scope::All.sees(&status));
        assert!(!Scope::Tenant("other".into()).sees(&status));
        // An operator's job is no tenant's.
        let mut operators = job.clone();
        Scope::All.claim(&mut operators).unwrap();
        assert_eq!(operators.tenant, None);
        assert!(!acme.sees(&JobStatus::queued(&operators, None)));
        // Another tenant's upload, an operator's, another job's results: refused, naming the field.
        for (field, key) in [
            ("init_image", "uploads/other/1.png"),
            ("init_image", "uploads/1.png"),
            ("init_image", "uploads/acme-2/1.png"),
            ("mask", "jobs/0b7e0e8e-7f1c-4bfb-9d0a-3a1b2c3d4e5f/0.png"),
        ] {
            let mut job = JobRequest::new(JobKind::Inpaint, "tiny", "a kite");
            job.init_image = Some(ImageSource::ObjectKey("uploads/acme/1.png".into()));
            job.mask = Some(ImageSource::ObjectKey("uploads/acme/2.png".into()));
            let source = Some(ImageSource::ObjectKey(key.into()));
            if field == "mask" {
                job.mask = source
            } else {
                job.init_image = source
            }
            match acme.claim(&mut job) {
                Err(Forbidden { field: Some(f), message }) => {
                    assert_eq!(f, field, "{key}");
                    assert!(message.contains(key) && message.contains("uploads/acme/"), "{message}");
                }
                other => panic!("{key}: {other:?}"),
            }
            // An operator may name any object.
            Scope::All.claim(&mut job).unwrap();
        }
    }
}
