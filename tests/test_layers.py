import subprocess
import sys


def test_pipeline_imports_without_prefect_or_torch():
    code = (
        "import sys, pipeline.survey, pipeline.cli; "
        "heavy = {'prefect', 'torch', 'tensorrt', 'flows'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_registry_needs_no_torch():
    code = "import sys, models.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
