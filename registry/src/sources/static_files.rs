//! Static resource files (temporary stand-in while the real source is written).
use std::path::{Path, PathBuf};
use isthmus_proto::model::OwnedResource;
use isthmus_proto::TrustDomain;
pub const ORIGIN_PREFIX: &str = "static:";
#[derive(Debug, Clone)]
pub struct SourceDefaults { pub cluster: String, pub network: String, pub trust_domain: TrustDomain }
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file:?}: {field}: {message}")]
pub struct ResourceError { pub file: PathBuf, pub document: Option<usize>, pub field: String, pub message: String }
pub struct ScanResult { pub changed: bool, pub errors: Vec<ResourceError> }
pub struct StaticSource { dir: PathBuf, errors: Vec<ResourceError> }
impl StaticSource {
    pub fn new(dir: PathBuf, _d: SourceDefaults) -> Self { Self { dir, errors: vec![] } }
    pub fn seed(&mut self, _p: Vec<OwnedResource>) {}
    pub fn scan(&mut self) -> ScanResult { ScanResult { changed: false, errors: vec![] } }
    pub fn resources(&self) -> Vec<OwnedResource> { vec![] }
    pub fn errors(&self) -> &[ResourceError] { &self.errors }
    pub fn dir(&self) -> &Path { &self.dir }
    pub fn invalidate(&mut self) {}
}
