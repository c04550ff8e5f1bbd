"""transferpipe: reproducible transfer learning for text classifiers."""
