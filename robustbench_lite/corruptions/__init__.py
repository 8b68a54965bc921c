"""Common corruptions (Hendrycks & Dietterich 2019): the ops at five severities (``ops``) and accuracy under
each (``evaluate``)."""
