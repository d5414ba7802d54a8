"""MediScan as a DICOM node: header cross-check results, Secondary Capture and Structured Report writers,
the Storage SCP that receives studies, the senders that store the results back (C-STORE, STOW-RS), and the
status file ``python app.py dicom --status`` reads (guide: docs/dicom.md)."""
