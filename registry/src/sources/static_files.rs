//! Static resource files (placeholder).
