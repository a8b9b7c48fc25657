"""BERT-family encoders fine-tuned for text classification (``hvdtrain bert``)."""
