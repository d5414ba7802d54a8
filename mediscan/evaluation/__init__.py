"""Layer 2: metrics (pure functions of logits and labels), the report, its figures and the gallery."""
