"""Data: sources, validation, stratified splits, class weights, tokenization, data versions, watching."""
