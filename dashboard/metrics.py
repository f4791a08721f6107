"""The dashboard's own metrics, beside the workers' and the producer's."""

from prometheus_client import Counter, Histogram

UPLOADS = Counter("steelsight_dashboard_uploads_total", "Images uploaded on the upload tab, by outcome", ["outcome"])
REFRESH_SECONDS = Histogram("steelsight_dashboard_refresh_seconds", "Time to build one live-tab refresh",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
IMAGES_LATE = Counter("steelsight_dashboard_images_late_total",
                      "Live-tab thumbnails shown as loading: not read within STEELSIGHT_DASHBOARD_IMAGE_WAIT_S "
                      "(counted at every refresh that shows them so)")
IMAGE_ERRORS = Counter("steelsight_dashboard_image_errors_total",
                       "Dashboard image reads that failed, on a store error for instance "
                       "(not a missing object or a refused image)")
FEEDBACK = Counter("steelsight_dashboard_feedback_total",
                   "Operator marks on the dashboard, by outcome (right, wrong, undone, refused)", ["outcome"])
FEEDBACK_SECONDS = Histogram("steelsight_dashboard_feedback_seconds",
                             "Time to store one mark (frame copy, provenance and index); the target is under 1 s",
                             buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
