//! The legacy padlock / unit-controller protocol (in progress).
