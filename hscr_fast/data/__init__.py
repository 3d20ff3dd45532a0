"""Data layer: record formats (LLaVA-Med JSON, preference JSONL), robust image loading, dataset converters.

Converters live in `hscr_fast.data.convert` (run as `python -m hscr_fast.data.convert ...`) and are not imported here.
"""
from hscr_fast.data.images import ImageLoadError, load_image, to_rgb, validate_image
from hscr_fast.data.records import (
                                    DataFormatError,
                                    PreferenceRecord,
                                    SkipReason,
                                    VQARecord,
                                    count_skip_reasons,
                                    load_llava_med_json,
                                    load_preference_jsonl,
                                    read_json_list,
                                    write_llava_med_json,
)

__all__ = [
    "DataFormatError", "ImageLoadError", "PreferenceRecord", "SkipReason", "VQARecord", "count_skip_reasons",
    "load_image", "load_llava_med_json", "load_preference_jsonl", "read_json_list", "to_rgb", "validate_image",
    "write_llava_med_json",
]
