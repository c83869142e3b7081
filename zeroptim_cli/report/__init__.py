"""What a person sees: rich tables (``tables``) and matplotlib figures (``plots``)."""
