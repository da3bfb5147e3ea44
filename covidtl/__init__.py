"""COVID-TL: transfer-learning CNNs that flag COVID-19 on chest X-rays, with Grad-CAM.

A research tool, not a medical device. Importing this package does nothing but define
names: no downloads, no seeding, no model loading.
"""

__version__ = "0.1.0"
