"""sipura-proxy: a transparent SIP B2BUA that secures legacy phones with x-sipura."""

__version__ = "0.1.0"
