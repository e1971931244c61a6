"""The cardiac-MRI domain in numpy/nibabel: NIfTI I/O, data sets, preprocessing, measures, phantom, metrics."""


class DataError(Exception):
    """A problem with the user's data: names the file and says what is wrong, in one line."""

    def __init__(self, path, message):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}  # ACDC convention, used everywhere inside the tool
DIAGNOSES = ("NOR", "DCM", "HCM", "MINF", "RV")  # ACDC groups; None means unknown


class UserError(Exception):
    """A bad request that is not about one file (an impossible prior, an unknown diagnosis)."""
