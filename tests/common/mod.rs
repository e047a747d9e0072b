#![allow(dead_code)]
pub mod harness;
// pub mod mock_upstream;
