"""Post-training int8 quantization with an accuracy gate: NNCF for OpenVINO, ONNX Runtime for ONNX (issue 20)."""
