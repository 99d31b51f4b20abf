//! Files from the Hugging Face Hub through hf-hub, in the standard cache. Honours `HF_HOME`,
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE=1`.

use super::FileSource;
use crate::error::{Error, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

pub struct HubSource {
    repo_id: String,
    revision: String,
    cache: Cache,
    /// `None` when offline.
    api: Option<ApiRepo>,
}

/// True when `HF_HUB_OFFLINE` is set to a true value.
pub fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

fn api() -> Result<Api> {
    // Retries resume an interrupted download where it stopped (range requests).
    let mut b = ApiBuilder::from_env().with_progress(true).with_retries(3);
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.is_empty() {
            b = b.with_token(Some(t));
        }
    }
    b.build()
        .map_err(|e| Error::Hub(format!("cannot set up the Hub client: {e}")))
}

impl HubSource {
    pub fn new(repo_id: &str, revision: &str) -> Result<Self> {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
        let api = if offline() {
            None
        } else {
            Some(api()?.repo(repo))
        };
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cache: Cache::from_env(),
            api,
        })
    }

    /// huggingface_hub's marker for a file known to be absent at a commit:
    /// `<cache>/models--org--name/.no_exist/<commit>/<file>`. Lets a cached model load with the
    /// network gone, without probing again for optional files (sharded indexes and the like).
    fn no_exist_marker(&self, rel: &str) -> Option<PathBuf> {
        let repo =
            Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone());
        let dir = self.cache.path().join(repo.folder_name());
        let commit = std::fs::read_to_string(dir.join("refs").join(&self.revision)).ok()?;
        Some(dir.join(".no_exist").join(commit.trim()).join(rel))
    }

    fn cached(&self, rel: &str) -> Option<PathBuf> {
        let repo =
            Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone());
        self.cache.repo(repo).get(rel)
    }
}

impl FileSource for HubSource {
    fn file(&self, rel: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(rel) {
            super::check_inside(&p, self.cache.path())?;
            return Ok(Some(p));
        }
        if self.no_exist_marker(rel).is_some_and(|m| m.exists()) {
            return Ok(None);
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.get(rel) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) => match e.as_ref() {
                ureq::Error::Status(404, _) => {
                    if let Some(m) = self.no_exist_marker(rel) {
                        // Best effort: without the marker the next run just asks again.
                        let _ = m.parent().map(std::fs::create_dir_all);
                        let _ = std::fs::File::create(&m);
                    }
                    Ok(None)
                }
                ureq::Error::Status(401 | 403, _) => Err(Error::Hub(format!(
                    "{}: access denied ({e}); accept the licence at https://huggingface.co/{} and set HF_TOKEN",
                    self.name(),
                    self.repo_id
                ))),
                _ => Err(Error::Hub(format!("{}: downloading `{rel}` failed: {e}; check the network and retry", self.name()))),
            },
            Err(e) => Err(Error::Hub(format!("{}: downloading `{rel}` failed: {e}; check the network and retry", self.name()))),
        }
    }

    fn missing_hint(&self) -> String {
        if self.api.is_none() {
            format!(
                "; it is not in the local Hub cache ({}) and HF_HUB_OFFLINE=1 forbids downloading: run once online first",
                self.cache.path().display()
            )
        } else {
            "; check the repo id and revision on the Hub".to_string()
        }
    }

    fn name(&self) -> String {
        if self.revision == "main" {
            self.repo_id.clone()
        } else {
            format!("{}@{}", self.repo_id, self.revision)
        }
    }
}
