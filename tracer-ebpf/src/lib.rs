//! Exists so that tracer-user can name this crate as a build dependency
//! (cargo then rebuilds tracer-user when the kernel programs change).
#![no_std]
