"""Layer 3: the Predictor (one pipeline for one image or many), its results and the ONNX backend."""
