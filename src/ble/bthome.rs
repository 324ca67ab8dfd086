//! BTHome v2 advertisements (in progress).
