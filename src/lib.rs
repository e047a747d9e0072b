pub mod config;
pub mod period;
pub mod pricing;
pub mod usage;
