pub mod bench;
pub mod events;
pub mod hash;
pub mod mocker;
pub mod simulate;
