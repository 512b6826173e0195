//! The exported policy on ONNX Runtime.
