"""The dashboard's own metrics, beside the workers' and the producer's."""

from prometheus_client import Counter, Histogram

UPLOADS = Counter("steelsight_dashboard_uploads_total", "Images uploaded on the upload tab, by outcome", ["outcome"])
REFRESH_SECONDS = Histogram("steelsight_dashboard_refresh_seconds", "Time to build one live-tab refresh",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
FEEDBACK = Counter("steelsight_dashboard_feedback_total",
                   "Operator marks on the dashboard, by outcome (right, wrong, undone, refused)", ["outcome"])
FEEDBACK_SECONDS = Histogram("steelsight_dashboard_feedback_seconds",
                             "Time to store one mark (frame copy, provenance and index); the target is under 1 s",
                             buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
