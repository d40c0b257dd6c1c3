//! CHE task generators (in progress).
