"""Bundled methods, one family per subpackage; the registry discovers (imports) every module here."""
