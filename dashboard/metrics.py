"""The dashboard's own metrics, beside the workers' and the producer's."""

from prometheus_client import Counter, Histogram

UPLOADS = Counter("steelsight_dashboard_uploads_total", "Images uploaded on the upload tab, by outcome", ["outcome"])
REFRESH_SECONDS = Histogram("steelsight_dashboard_refresh_seconds", "Time to build one live-tab refresh",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
