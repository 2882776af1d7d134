"""`unlearnlm audit`: attack an unlearned model (relearning, quantization, extraction beyond greedy
decoding), score every attack with the official scoring, and write a deletion receipt."""

from unlearnlm.audit.run import AuditSettings, run_audit

__all__ = ["AuditSettings", "run_audit"]
