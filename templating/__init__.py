"""templating: conversations, text and images -> model inputs (a pure string-and-tensor layer).

Only I/O: reading template, dataset and image files. Never imports `rounding` or `adapters`.
"""

from signround.templating.calibration import (
    CalibrationSet,
    TextCalibration,
    calibration_batches,
    conversation_calibration,
    encode_conversation,
    text_calibration,
    text_calibration_set,
)
from signround.templating.collate import collate
from signround.templating.datasets import (
    ConversationDataset,
    ConversationSample,
    DatasetError,
    SelfGenerated,
    TextDataset,
    conversation_texts,
    load_dataset,
    load_llava_json,
    load_text_file,
)
from signround.templating.embedded import builtin_texts, embedded_dataset, embedded_texts
from signround.templating.generated import self_calibration
from signround.templating.images import DEFAULT_MAX_PIXELS, ImageError, bound_image, open_image
from signround.templating.processors import (
    PROCESSORS,
    ImageTokensCut,
    ProcessorError,
    RegisteredProcessor,
    get_processor,
    list_processors,
    register_processor,
    truncate,
)
from signround.templating.render import ConversationError, Turn, normalize, render
from signround.templating.template import PLACEHOLDER, Template, TemplateError, list_presets, load_template

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PLACEHOLDER",
    "PROCESSORS",
    "CalibrationSet",
    "ConversationDataset",
    "ConversationError",
    "ConversationSample",
    "DatasetError",
    "ImageError",
    "ImageTokensCut",
    "ProcessorError",
    "RegisteredProcessor",
    "SelfGenerated",
    "Template",
    "TemplateError",
    "TextCalibration",
    "TextDataset",
    "Turn",
    "bound_image",
    "builtin_texts",
    "calibration_batches",
    "collate",
    "conversation_calibration",
    "conversation_texts",
    "embedded_dataset",
    "embedded_texts",
    "encode_conversation",
    "get_processor",
    "list_presets",
    "list_processors",
    "load_dataset",
    "load_llava_json",
    "load_template",
    "load_text_file",
    "normalize",
    "open_image",
    "register_processor",
    "render",
    "self_calibration",
    "text_calibration",
    "text_calibration_set",
    "truncate",
]
