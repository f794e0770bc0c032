"""GSM8K (or synthetic) accuracy of any checkpoint."""
