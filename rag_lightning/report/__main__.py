from rag_lightning.report.cli import main

main()
